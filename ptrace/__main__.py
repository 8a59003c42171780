from ptrace.cli import main

main()
