from casbah.cli import main

main()
