#!/usr/bin/env bash
# Installs the system packages concord's build and tests need on a fresh Debian machine.
# `scripts/install-deps.sh bench` adds etcd-server and zookeeper (with a Java runtime) for the
# comparison benchmark.
# Idempotent: packages already present are skipped. Needs root (or sudo).
set -euo pipefail

packages=(
  libclang-dev      # bindgen for librocksdb-sys
  clang             # bindgen finds libclang through it
  build-essential   # the C++ compiler for RocksDB itself
  pkg-config
  iproute2          # `ss` (scripts/cluster.sh), `ip netns` and `tc` (the fault tests' test hosts)
  iptables          # random packet loss on a test host (the fault tests' lossy nemesis)
  procps            # `kill -STOP/-CONT` (the fault tests' pause nemesis)
  libfaketime       # skewed wall clocks for one node (the fault tests' clock nemesis)
  protobuf-compiler # protoc for etcd-client's gRPC bindings (concord-loadgen's etcd target)
  libprotobuf-dev   # the well-known .proto files (descriptor.proto) etcd's protos import
  fonts-dejavu-core # the font concord-loadgen draws its --plot charts with
  jq                # reading `concordctl -o json` in scripts/bench-placement.sh
)
# `install-deps.sh bench`: also the systems concord is compared with.
if [[ ${1:-} == bench ]]; then
  packages+=(etcd-server zookeeper)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done

sudo_cmd=""
[[ $(id -u) -ne 0 ]] && sudo_cmd="sudo"
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# `install-deps.sh bench`: QUIC's UDP socket buffers (concord asks for 4 MiB each way; the
# kernel caps it at these limits, 208 KiB by default, and a busy node then drops datagrams).
if [[ ${1:-} == bench ]]; then
  for limit in net.core.rmem_max net.core.wmem_max; do
    if (($(sysctl -n "$limit") < 4194304)); then
      echo "raising $limit to 4194304 for QUIC's socket buffers" >&2
      $sudo_cmd sysctl -qw "$limit=4194304" ||
        echo "could not raise $limit (a container?); concord will drop more datagrams" >&2
    fi
  done
fi
