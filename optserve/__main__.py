from optserve.cli import main

raise SystemExit(main())
