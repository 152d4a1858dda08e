# forward-auth in a container: non-root (UID 1000), state in the /data volume,
# works with a read-only root filesystem and a tmpfs /tmp (see compose.yaml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=3000 \
    DB_PATH=/data/auth.db

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt \
 && useradd --uid 1000 --user-group --no-create-home --shell /usr/sbin/nologin forward-auth \
 && mkdir /data && chown 1000:1000 /data && chmod 0700 /data
COPY forward_auth.py .
COPY languages/ languages/
# Run as a module from its .pyc: a script is recompiled at every start and
# keeps about 3 MB more resident.
RUN python -m compileall -q /app

USER 1000:1000
VOLUME /data
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '3000'), timeout=2)"]
ENTRYPOINT ["python", "-m", "forward_auth"]
