from egm.cli import main

raise SystemExit(main())
