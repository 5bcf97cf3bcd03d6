from eyewall.cli import main

raise SystemExit(main())
