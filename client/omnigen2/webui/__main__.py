from omnigen2.webui.app import main

main()
