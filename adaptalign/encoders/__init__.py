"""What the system and the data side both need from pre-trained encoders: loading, batching."""
