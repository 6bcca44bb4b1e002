"""The app's routes, one module per group, each an `APIRouter` whose handlers reach what they
share through `server_state(request)`: generation (the completions), models, tokenization,
operations (/health, /metrics). The chat page's files are in `ember.server.page`."""
