from budgetune.cli import main

raise SystemExit(main())
