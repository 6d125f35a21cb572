from ctloop.cli import main

main()
