from sfworkflow.cli.main import main

raise SystemExit(main())
