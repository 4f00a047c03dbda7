# sfworkflow service image: slim Python, non-root user, `sfworkflow run` as the entry point.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sfworkflow ./sfworkflow
COPY schemas ./schemas
RUN pip install --no-cache-dir --prefix=/install '.[service]'

FROM python:3.11-slim AS runtime
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sfworkflow
COPY --from=build /install /usr/local
USER sfworkflow
ENV SFWORKFLOW_HTTP_PORT=8080 \
    PYTHONUNBUFFERED=1
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["sfworkflow"]
CMD ["run"]

# The demo's simulated SalesFlow worker (written on the worker SDK) for compose.yaml: the service image plus the
# demo package, which the wheel leaves out. `docker build --target demo .`
FROM runtime AS demo
COPY --chown=root:root sfworkflow/demo /usr/local/lib/python3.11/site-packages/sfworkflow/demo
CMD ["worker", "--seconds", "31536000"]

# The default target: the service alone.
FROM runtime
