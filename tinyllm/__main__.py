from tinyllm.cli import main

raise SystemExit(main())
