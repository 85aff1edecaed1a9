{
  "targets": [
    {
      "target_name": "blockferry_native",
      "sources": ["native/blockferry_native.c"],
      "cflags": ["-Wall", "-O2"]
    }
  ]
}
