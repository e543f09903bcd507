"""The controller's live dashboard: a pure snapshot of its state (``snapshot``), rates over
the last minutes (``history``), and the pages that show them (``routes``, ``static/``)."""
