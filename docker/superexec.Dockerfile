# syntax=docker/dockerfile:1
# The image that runs DDOME's ServerApp and ClientApps: Flower's SuperExec plus the app's
# dependencies (the app code itself arrives with each run, as a FAB, from `flwr run`).
#
#   docker build -f docker/superexec.Dockerfile -t ddome-superexec .
#   # CUDA build (PyPI's Linux torch wheels are CUDA builds):
#   docker build -f docker/superexec.Dockerfile --build-arg TORCH_INDEX_URL=https://pypi.org/simple -t ddome-superexec:cuda .
ARG FLWR_VERSION=1.41.0
FROM flwr/superexec:${FLWR_VERSION}

# Where torch and torchvision come from. The default gives small CPU-only wheels; any
# https://download.pytorch.org/whl/cu1xx index (or PyPI itself) gives CUDA builds.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Optional exact pins, e.g. --build-arg TORCH_SPEC="torch==2.8.0 torchvision==0.23.0".
ARG TORCH_SPEC=""

USER root
# Folders the compose file mounts volumes on; owned by the image's `app` user so that
# named volumes start out writable by it.
RUN mkdir -p /app/outputs /app/cache /data \
    && chown -R app:app /app/outputs /app/cache /data
USER app
WORKDIR /app

# Install [project].dependencies from pyproject.toml, minus flwr (the image's flwr is the
# one that matches the SuperLink/SuperNode images) and with torch from TORCH_INDEX_URL.
COPY --chown=app:app pyproject.toml /tmp/ddome-pyproject.toml
RUN python -c "import re, sys; \
tomllib = __import__('tomllib') if sys.version_info >= (3, 11) else __import__('pip._vendor.tomli', fromlist=['loads']); \
deps = tomllib.load(open('/tmp/ddome-pyproject.toml', 'rb'))['project']['dependencies']; \
name = lambda d: re.split(r'[<>=!~\[; ]', d, maxsplit=1)[0].lower(); \
torch = [d for d in deps if name(d) in ('torch', 'torchvision')]; \
rest = [d for d in deps if name(d) not in ('torch', 'torchvision', 'flwr')]; \
open('/tmp/torch.txt', 'w').write('\n'.join(torch) + '\n'); \
open('/tmp/requirements.txt', 'w').write('\n'.join(rest) + '\n')" \
    && if [ -n "${TORCH_SPEC}" ]; then echo "${TORCH_SPEC}" | tr ' ' '\n' > /tmp/torch.txt; fi \
    && python -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" -r /tmp/torch.txt \
    && python -m pip install --no-cache-dir -r /tmp/requirements.txt \
    && python -c "import torch, torchvision, flwr; print('torch', torch.__version__, 'flwr', flwr.__version__)"

ENTRYPOINT ["flower-superexec"]
