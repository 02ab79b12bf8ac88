"""The OmniGen2 web UI: a Gradio app that is a client of this SDK (it talks to a running server over gRPC).

pip install 'omnigen2-client[webui]'
python -m omnigen2.webui --server 127.0.0.1:50051      # or `make demo` beside `make serve`
"""
