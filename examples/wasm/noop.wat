;; Does nothing: the launch-overhead benchmark's module.
(module
  (memory (export "memory") 1)
  (func (export "_start")))
