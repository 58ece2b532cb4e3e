;; Agora's demo module: prints a greeting and its arguments to stdout, then returns from
;; `_start` (exit code 0). `agora run --wasm examples/wasm/hello.wat -- world` assembles the
;; text form itself (as `wasmtime run` does); any `.wasm` file is uploaded as it is.
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "hello from wasm:")
  (data (i32.const 96) "\n")
  (func $write (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func (export "_start")
    (local $len i32)
    (local $i i32)
    (call $write (i32.const 64) (i32.const 16))
    ;; argv strings at 4096 (pointers at 1024): print them space-separated, skipping argv[0]
    (drop (call $args_sizes_get (i32.const 16) (i32.const 20)))
    (drop (call $args_get (i32.const 1024) (i32.const 4096)))
    (local.set $len (i32.load (i32.const 20)))
    ;; NULs become spaces, the final one a newline
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
        (if (i32.eqz (i32.load8_u (i32.add (i32.const 4096) (local.get $i))))
          (then (i32.store8 (i32.add (i32.const 4096) (local.get $i)) (i32.const 32))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (if (local.get $len)
      (then (i32.store8 (i32.add (i32.const 4095) (local.get $len)) (i32.const 10))))
    ;; skip argv[0]: start after the first separator
    (local.set $i (i32.const 0))
    (block $found
      (loop $scan
        (br_if $found (i32.ge_u (local.get $i) (local.get $len)))
        (br_if $found (i32.eq (i32.load8_u (i32.add (i32.const 4096) (local.get $i))) (i32.const 32)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $scan)))
    (if (i32.ge_u (local.get $i) (local.get $len))
      (then (call $write (i32.const 96) (i32.const 1)) (return)))
    (call $write (i32.add (i32.const 4096) (local.get $i)) (i32.sub (local.get $len) (local.get $i)))))
