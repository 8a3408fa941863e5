"""`duo serve`: an OpenAI-compatible HTTP server over one Engine (FastAPI + uvicorn).

    schemas.py    request bodies checked and turned into generation arguments; OpenAI-style errors
    scheduler.py  one generation at a time from a bounded FIFO queue, in a worker thread; cancellation
    responses.py  completion / chunk / logprob objects as the OpenAI API shapes them
    metrics.py    Prometheus counters and histograms (/metrics)
    app.py        the routes, authentication, body limits, error handlers
    cli.py        the `duo serve` command (an entry point in the "duo.commands" group)
"""
