"""The OmniGen2 web UI: a Gradio app that is a client of this SDK (it talks to a running server over gRPC).

pip install 'omnigen2-client[webui]'
python -m omnigen2.webui --server 127.0.0.1:50051      # or `make demo` beside `make serve`
"""

import os

# Gradio reports usage to its makers unless told not to (read when gradio is imported): a private deployment's UI
# stays quiet unless its operator sets GRADIO_ANALYTICS_ENABLED=True.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
