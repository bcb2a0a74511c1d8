# Images of kine-rs and kine-rs-controller, from one multi-stage build.
#
#   docker build --target kine-rs            -t kine-rs .
#   docker build --target controller         -t kine-rs-controller .
#
# UNTESTED: the machines this project is developed on have no container engine, so this
# file has never been built. It is written to be conventional (a Rust builder, then a
# distroless non-root runtime); report what fails.

FROM rust:1.95-bookworm AS builder
WORKDIR /src
# protoc is not needed: kine-rs compiles its protos with protox.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p kine-rs --bin kine-rs -p kine-rs-controller --bin kine-rs-controller \
    && mkdir -p /out \
    && cp target/release/kine-rs target/release/kine-rs-controller /out/

# glibc-linked binaries: distroless "cc" has libc and libgcc; :nonroot runs as 65532.
FROM gcr.io/distroless/cc-debian12:nonroot AS kine-rs
COPY --from=builder /out/kine-rs /usr/local/bin/kine-rs
USER 65532:65532
EXPOSE 2379
ENTRYPOINT ["/usr/local/bin/kine-rs"]

FROM gcr.io/distroless/cc-debian12:nonroot AS controller
COPY --from=builder /out/kine-rs-controller /usr/local/bin/kine-rs-controller
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/kine-rs-controller"]
