from evalsuite.cli import console_main

console_main()
