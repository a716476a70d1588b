from egm.cli import main

# Guarded: vLLM's spawned engine process imports this module again as __mp_main__.
if __name__ == "__main__":
    raise SystemExit(main())
