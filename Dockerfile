# One image runs the API (default) or the worker:
#   docker run ferry                                  -> uvicorn app.main:app
#   docker run ferry arq worker.WorkerSettings        -> the worker
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md worker.py ./
COPY app ./app
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 ferry
COPY --from=build /install /usr/local
WORKDIR /srv/ferry
COPY resources.toml worker.py ./
ENV FERRY_RESOURCES_FILE=/srv/ferry/resources.toml \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER ferry
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)" || exit 1
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers", "--no-access-log"]
