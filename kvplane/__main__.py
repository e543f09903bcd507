from kvplane.cli import main

raise SystemExit(main())
