# gdm-ray on the official Ray image, for KubeRay (cluster/) or plain `docker run`.
#
#   docker build -t gdm-ray:0.1.0-ray2.60.0-cpu .                         # CPU
#   docker build --build-arg VARIANT=gpu -t gdm-ray:0.1.0-ray2.60.0-gpu . # CUDA
#   docker run --rm gdm-ray:0.1.0-ray2.60.0-cpu zoo-scan --help
#
# RAY_VERSION must equal the ray pin in pyproject.toml (tests/test_cluster.py
# checks it, and the image tags in cluster/ that carry it). The base is
# rayproject/ray:<version>-py311-<cpu|gpu>: Ubuntu with Ray and Python 3.11
# (conda, /home/ray/anaconda3) for cpu; the same on NVIDIA's CUDA image for
# gpu (an alias of the release's default -cuXYZ tag). Its user is `ray`
# (uid 1000, gid 100), which this image keeps: nothing runs as root.
#
# KubeRay replaces the entry point of the pods it makes (`ray start ...` on
# the head and workers, `ray job submit ...` in a RayJob's submitter), so the
# same image serves `docker run IMAGE <command> key=value ...` and the cluster.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG VARIANT=cpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${VARIANT}

# An ARG before FROM is not visible after it: declared again to use them below.
ARG RAY_VERSION
ARG VARIANT
# The torch the Makefile pins. cpu: the CPU wheel from PyTorch's index (PyPI's
# Linux wheel is a multi-GB CUDA build); gpu: PyPI's wheel, which carries its
# own CUDA runtime (the node needs only the NVIDIA driver and device plugin).
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# 1: Fashion-MNIST from the distribution's dataset-fashion-mnist package, at
# /usr/share/datasets/fashion-mnist (data=fashion_mnist's default path) on
# every node. 0: bring data on a volume or S3 and pass data.path=...
ARG WITH_FASHION_MNIST=1

USER 0
# hadolint ignore=DL3008
RUN if [ "${WITH_FASHION_MNIST}" = "1" ]; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends dataset-fashion-mnist \
      && rm -rf /var/lib/apt/lists/*; \
    fi

USER 1000:100
WORKDIR /home/ray/gdm-ray

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN case "${VARIANT}" in \
      cpu) pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_CPU_INDEX}" ;; \
      gpu) pip install --no-cache-dir "torch==${TORCH_VERSION}" ;; \
      *) echo "VARIANT must be cpu or gpu, not '${VARIANT}'" >&2; exit 1 ;; \
    esac

# The project (not editable: no source tree is needed at run time). Its
# configs/ stay here and GDM_RAY_CONFIG_DIR points the CLI at them.
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 gdm_ray ./gdm_ray
COPY --chown=1000:100 configs ./configs
RUN pip install --no-cache-dir . \
    && python -c "import ray, torch, gdm_ray; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

ENV GDM_RAY_CONFIG_DIR=/home/ray/gdm-ray/configs
WORKDIR /home/ray
ENTRYPOINT ["gdm-ray"]
CMD ["--help"]
