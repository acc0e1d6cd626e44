"""Route a dataset with a frozen Grouter into a routing cache (= mg-predispatch)."""

from megatron_grouter.offline.predispatch import main

if __name__ == "__main__":
    main()
