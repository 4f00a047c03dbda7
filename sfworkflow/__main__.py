from sfworkflow.cli import main

raise SystemExit(main())
