# GPU training image for MuonClip MoE pretraining.
#   docker build -t muonclip-moe .
#   docker run --gpus all --ipc=host --rm -v "$PWD/outputs:/workspace/outputs" muonclip-moe
# (outputs/ must be writable by uid 1000, or add --user "$(id -u):$(id -g)")
# torch 2.13.0 wheels bundle CUDA 13.0 + cuDNN + NCCL (host driver >= 580). For older drivers build the CUDA 12.6
# variant: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# Python 3.11.7 is the interpreter the test suite runs on.
FROM python:3.11.7-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    WANDB_MODE=offline

RUN useradd --create-home --uid 1000 trainer \
    && mkdir -p /workspace \
    && chown trainer:trainer /workspace
WORKDIR /workspace

# torch first, from the CUDA index alone (it also serves torch's own dependencies); then the exact pins of
# requirements.txt from the default index (torch is already satisfied)
COPY requirements.txt .
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && pip install --no-cache-dir -r requirements.txt

COPY --chown=1000:1000 . .
USER 1000:1000

# Default: one node, every visible GPU. Override the command for other jobs, e.g.
#   docker run ... muonclip-moe torchrun --standalone --nproc-per-node=gpu train.py --config configs/small_gpu.yaml --parallel.ep=8
#   multi-node: launch/run_multi_node.sh or launch/slurm.sbatch inside the container
CMD ["torchrun", "--standalone", "--nproc-per-node=gpu", "train.py", "--config", "configs/small_gpu.yaml"]
