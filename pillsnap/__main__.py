from pillsnap.cli import main

raise SystemExit(main())
