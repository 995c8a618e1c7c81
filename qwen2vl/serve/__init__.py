"""The OpenAI-compatible server (optional extra: fastapi, uvicorn)."""
