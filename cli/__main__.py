from suncet.cli.main import main

main()
