from suncet.cli.entry import main

main()
