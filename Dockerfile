# The backup site (blockferry replay) as a small non-root image. Data lives on the /data volume.
#   docker build -t blockferry .
#   docker run -d -p 7070:7070 -p 127.0.0.1:9101:9101 -v replicas:/data blockferry
# test/container.test.ts runs this file's ENTRYPOINT + CMD and HEALTHCHECK outside Docker.

FROM node:20-bookworm-slim AS build
# node-gyp builds the native helper (fallocate, SEEK_DATA/SEEK_HOLE); without it the fallbacks are used.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 make g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY package.json package-lock.json binding.gyp tsconfig.json ./
COPY native ./native
COPY src ./src
RUN npm ci --no-audit --no-fund && npm prune --omit=dev

FROM node:20-bookworm-slim
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
