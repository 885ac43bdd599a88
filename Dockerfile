# The similar-banners service: gunicorn + Flask on CPU-only PyTorch.
#
#   docker build -t steam-dino .                                  # index mounted at run time:
#   docker run -p 8000:8000 -v "$PWD/data:/srv/data:ro" steam-dino
#   docker build --target baked -t steam-dino:baked .             # index baked into the image
#
# Checkpoints for uploads are downloaded on first use into $TORCH_HOME (/srv/torch);
# mount a folder there (or set PRELOAD_MODELS) to avoid the first-upload delay.

FROM python:3.11-slim AS service
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv
COPY requirements.txt ./
# CPU-only wheels of the pinned torch/torchvision (no CUDA libraries: ~10x smaller), then the rest.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1 \
 && pip install -r requirements.txt
RUN useradd --create-home --uid 10001 app && mkdir -p /srv/data /srv/torch && chown app /srv/torch
COPY app/ app/
COPY core/ core/
COPY serving/ serving/
COPY wsgi.py gunicorn.conf.py ./
ENV PORT=8000 INDEX_DIR=/srv/data/index BANNERS_DIR=/srv/data/banners TORCH_HOME=/srv/torch
USER app
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]

FROM service AS baked
COPY data/index /srv/data/index
