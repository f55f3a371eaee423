# kpr's image: built from the workspace, the runtime stage holds only kpr.
#
#   docker build -t kpr .
#
# Build stage: rustup's stable and nightly (nightly builds the eBPF programs
# with rust-src), bpf-linker against nightly's libLLVM, as `cargo xtask setup`;
# protoc for the CRI protos.
FROM debian:bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates gcc libc6-dev pkg-config \
        protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain stable \
    && /root/.cargo/bin/rustup toolchain install nightly --profile minimal --component rust-src
ENV PATH=/root/.cargo/bin:$PATH
WORKDIR /src
COPY . .
RUN cargo xtask setup --toolchain-only \
    && cargo build --release --package proxy-userspace --bin kpr

# Runtime stage: iptables for the fallback mode, and kpr.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends iptables conntrack \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/kpr /kpr
ENTRYPOINT ["/kpr"]
