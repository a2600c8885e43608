from dsmoe.cli import main

raise SystemExit(main())
