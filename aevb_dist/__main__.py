from aevb_dist.cli import main

raise SystemExit(main())
