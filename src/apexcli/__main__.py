from apexcli.cli import main

main()
