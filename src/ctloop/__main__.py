from ctloop.cli import main

if __name__ == "__main__":  # not when a worker process (the harvest's redaction) imports the main module
    main()
