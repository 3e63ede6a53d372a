from specdec.tools.cli import main

raise SystemExit(main())
