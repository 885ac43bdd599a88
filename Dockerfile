# The similar-banners service: gunicorn + Flask on CPU-only PyTorch.
#
#   docker build -t steam-dino .                                  # index mounted at run time:
#   docker run -p 8000:8000 -v "$PWD/data:/srv/data:ro" steam-dino
#   docker build --target baked -t steam-dino:baked .             # index baked into the image
#
#   docker run -p 8000:8000 -e INDEX_URL=https://.../index.tar -e INDEX_SHA256=... steam-dino   # fetched at boot
#
# Checkpoints for uploads are downloaded on first use into $TORCH_HOME (/srv/torch), or at boot with INDEX_URL;
# mount a folder there (or set PRELOAD_MODELS) to avoid the first-upload delay.
# The Python version is .python-version's; requirements.txt pins the CPU-only torch/torchvision (README "Deploy").

FROM python:3.11-slim AS service
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv
COPY requirements.txt ./
RUN pip install -r requirements.txt
RUN useradd --create-home --uid 10001 app && mkdir -p /srv/data /srv/torch && chown app /srv/data /srv/torch
COPY core/ core/
COPY app/ app/
COPY serving/ serving/
COPY wsgi.py gunicorn.conf.py ./
ENV PORT=8000 INDEX_DIR=/srv/data/index BANNERS_DIR=/srv/data/banners TORCH_HOME=/srv/torch
USER app
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"
CMD ["python", "-m", "serving.launch"]

FROM service AS baked
COPY data/index /srv/data/index
