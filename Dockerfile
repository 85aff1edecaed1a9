# The backup site (blockferry replay) as a small non-root image. Data lives on the /data volume.
#   docker build -t blockferry .
#   docker run -d -p 7070:7070 -p 127.0.0.1:9101:9101 -v replicas:/data blockferry
# test/container-image.test.ts builds this file with podman (on a bookworm base made on the test machine, passed
# as NODE_IMAGE) and runs the image; test/container.test.ts runs its ENTRYPOINT + CMD and HEALTHCHECK directly.

# Any Debian bookworm image with Node.js 20 under /usr/local, its headers in /usr/local/include/node.
ARG NODE_IMAGE=node:20-bookworm-slim

FROM ${NODE_IMAGE} AS build
# node-gyp builds the native helper (fallocate, SEEK_DATA/SEEK_HOLE, the replayer's batched writes) against the
# image's own Node headers, so the build needs no download from nodejs.org and the headers match the binary.
# Outside an image a failed helper build falls back to slower paths; here it fails the build instead.
ENV npm_config_nodedir=/usr/local
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 make g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY package.json package-lock.json binding.gyp tsconfig.json ./
COPY native ./native
COPY src ./src
RUN npm ci --no-audit --no-fund \
 && test -f build/Release/blockferry_native.node \
 && npm prune --omit=dev

FROM ${NODE_IMAGE}
ENV NODE_ENV=production BLOCKFERRY_LOG_FORMAT=json
WORKDIR /app
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
COPY --from=build /app/build ./build
COPY package.json LICENSE README.md ./
RUN mkdir -p /data && chown node:node /data
USER node
VOLUME ["/data"]
EXPOSE 7070 9101
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 CMD ["node", "-e", "fetch('http://127.0.0.1:9101/status').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
ENTRYPOINT ["node", "/app/dist/cli/index.js"]
CMD ["replay", "--listen", "0.0.0.0:7070", "--data-dir", "/data", "--admin", "0.0.0.0:9101"]
