from adaptalign.cli import main

raise SystemExit(main())
