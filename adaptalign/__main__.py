from adaptalign.lightning_modules.cli import main

main()
