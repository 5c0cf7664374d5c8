// placeholder: built from clients/js/src by npm run build
