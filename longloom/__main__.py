from longloom.cli import main

raise SystemExit(main())
