"""Plan routing-aware expert parallelism from a routing cache (= mg-plan-ep)."""

from megatron_grouter.offline.plan_ep import main

if __name__ == "__main__":
    main()
