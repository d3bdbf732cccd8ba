"""``python -m analytics_pipeline`` is the same as the ``analytics-pipeline`` command."""

from analytics_pipeline.main import main

raise SystemExit(main())
