;; Spins forever: run it with `--fuel N` or `--timeout DUR` to see a limit end it.
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $forever (br $forever))))
